"""The GraphQL service (:9095): one typed graph over models, deployments, accounts, usage and
costs, with mutations, subscriptions over WebSocket fed by the live event feed, cost limits and
tenant scoping. ``app`` wires it; ``schema`` and ``types`` define the graph; ``context`` holds the
caller's scope and the DataLoaders; ``protect`` the cost model and error translation."""

from citadel.graphql.app import GraphQLDeps, create_app, default_deps

__all__ = ["GraphQLDeps", "create_app", "default_deps"]
