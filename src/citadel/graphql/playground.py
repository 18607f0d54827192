"""The GraphiQL playground: the page, and its scripts and styles shipped in the package
(``assets/``: GraphiQL 3.8, MIT; React 18.3, MIT), so it works without a CDN (air-gapped).

The page itself is served at ``GET /graphql`` to a browser with the admin key
(``citadel.graphql.app``); its assets are open, as they hold nothing but the playground's code.
"""

from __future__ import annotations

from importlib import resources
from typing import Final

from litestar import Response, get
from litestar.exceptions import NotFoundException
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath

__all__ = ["ASSETS", "playground_handlers", "playground_page"]

ASSETS: Final = {
    "graphiql.min.js": "text/javascript",
    "graphiql.min.css": "text/css",
    "react.production.min.js": "text/javascript",
    "react-dom.production.min.js": "text/javascript",
}
_PREFIX: Final = "/graphql/assets"
_PAGE: Final = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Citadel GraphQL</title>
<style>body {{ margin: 0; height: 100vh; }} #graphiql {{ height: 100vh; }}</style>
<link rel="stylesheet" href="{prefix}/graphiql.min.css">
</head>
<body>
<div id="graphiql">Loading the playground...</div>
<script src="{prefix}/react.production.min.js"></script>
<script src="{prefix}/react-dom.production.min.js"></script>
<script src="{prefix}/graphiql.min.js"></script>
<script>
const url = new URL("{path}", window.location.href);
const wsUrl = url.href.replace(/^http/, "ws");
const fetcher = GraphiQL.createFetcher({{url: url.href, subscriptionUrl: wsUrl}});
const root = ReactDOM.createRoot(document.getElementById("graphiql"));
root.render(React.createElement(GraphiQL, {{
  fetcher,
  defaultEditorToolsVisibility: true,
  defaultQuery: "{{ viewer {{ admin }} models(first: 10) "
    + "{{ nodes {{ name deployments {{ nodes {{ name state }} }} }} }} }}\\n",
}}));
</script>
</body>
</html>
"""


def playground_page(path: str) -> bytes:
    return _PAGE.format(prefix=_PREFIX, path=path).encode()


def playground_handlers() -> list[HTTPRouteHandler]:
    @get(f"{_PREFIX}/{{name:str}}", include_in_schema=False, sync_to_thread=False)
    def asset(name: FromPath[str]) -> Response[bytes]:
        media_type = ASSETS.get(name)
        if media_type is None:
            raise NotFoundException()
        body = resources.files("citadel.graphql").joinpath("assets", name).read_bytes()
        return Response(
            body, media_type=media_type, headers={"cache-control": "public, max-age=86400"}
        )

    return [asset]
