"""Push notifications: SUBSCRIBE/UNSUBSCRIBE subscriptions, their deadlines, and delivery to push gateways.

Layout (sans-IO cores with thin Trio shells):

- :mod:`.subscribe_bodies` parses SUBSCRIBE / UNSUBSCRIBE bodies in both dialects (current OpenDHT's, and
  the seed dialect's ``callback_id``).
- :mod:`.subscriptions` is the subscription book: identities, explicit states, deadlines, the payloads to
  send.
- :mod:`.payloads` builds the ``data`` dictionaries and defines :class:`~.payloads.Push`.
- :mod:`.gateway` is the one interface every push gateway implements; :mod:`.gorush` and :mod:`.unifiedpush`
  are the gateways, :mod:`.webpush_crypto` is RFC 8291 encryption and :mod:`.ssrf` guards UnifiedPush
  endpoints.
- :mod:`.delivery` decides what to send and when (batching, coalescing, retries, pruning, bounds) and
  :mod:`.dispatcher` sends it, up to a bound of requests per gateway kind; neither knows any provider's JSON.
- :mod:`.service` is the Trio shell that runs it all against a :class:`trio_dht.api.Dht`.
"""
