"""API doubles: real HTTP servers on loopback implementing the documented registry semantics."""
