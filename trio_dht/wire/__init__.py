"""OpenDHT's UDP wire format, sans-IO: messages, compact node records and value fragments."""
