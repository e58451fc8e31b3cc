"""``detseg serve``: an HTTP server (FastAPI + uvicorn) for any registered model, with a web page.

``limits.py`` holds the request limits, ``pool.py`` the per-model worker threads and bounded
queue, ``encoding.py`` image decoding and response bodies, ``app.py`` the routes
(``create_app``), ``run.py`` the start-up (load models once, run uvicorn) and ``static/`` the page.
"""
