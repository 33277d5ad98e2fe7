"""Processing offload (seed 000): a near replica processes each write for a far target
against the content it overwrites (codec.py, image.py), in its receiver session
(session.py); the node shipping to the far target relays the result (relay.py)."""
