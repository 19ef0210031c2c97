"""The web view: ``flowstone web`` (and ``flowstone dev``). Install ``flowstone[web]``.

``create_app`` (``flowstone.web.app``) builds the Starlette application and ``serve``
(``flowstone.web.server``) runs it on Hypercorn; ``flowstone.web.data`` computes what
the pages show (also used by ``flowstone status``), ``flowstone.web.html`` draws them.
Importing this package loads neither Starlette nor Hypercorn.
"""
