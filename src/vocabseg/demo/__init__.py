"""``vocabseg demo``: a local, offline web page to segment an image with several methods and compare them.

The page (``static/index.html``) is one self-contained file: inline CSS and JavaScript, no fonts, scripts or
analytics from the internet. :mod:`vocabseg.demo.server` holds the request logic (:class:`DemoApp`, testable
without a socket), :mod:`vocabseg.demo.web` the HTTP side (Starlette on uvicorn: size limits, read timeout, Host
checks, security headers, graceful shutdown); the command is in :mod:`vocabseg.cli.demo`.
"""
