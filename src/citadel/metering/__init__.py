"""Metering: usage events, pricing, the ledger."""
