"""``trio-dht --interactive``: dhtnode's prompt over the running node.

``commands`` parses a line into a command and formats the node's answers as dhtnode prints them (sans-IO);
``shell`` is the Trio side: it reads lines in a worker thread and runs the commands on the node.
"""

from trio_dht.interactive.shell import Prompt

__all__ = ["Prompt"]
