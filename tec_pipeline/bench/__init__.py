"""`tec bench`: what caching buys, measured side by side in one process (design §7, issue 9)."""
