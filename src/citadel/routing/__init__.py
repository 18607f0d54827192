"""Routing: choosing a deployment of a model for each request."""
