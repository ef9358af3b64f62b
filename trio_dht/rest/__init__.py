"""What the REST proxy and its clients share: the value JSON, the ``{hash}`` key rules, the route shapes and
the push details of a permanent put. Neither side's code lives here, so the client (:mod:`trio_dht.client`)
and the push service (:mod:`trio_dht.push`) do not import the server's package (:mod:`trio_dht.proxy`).
"""
