"""What the ingress and the worker share: the frame format, the protobuf
messages and wire shortcuts, status codes, and every default both sides must
agree on.  Nothing here loads numpy."""
