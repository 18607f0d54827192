"""Clients of the external stores, kept thin: the request path pays for every microsecond."""
