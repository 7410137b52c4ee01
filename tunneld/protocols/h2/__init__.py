"""The HTTP/2 edge: HTTP/2 on the reactor through ngh2 (libnghttp2), for gRPC and HTTP/2 traffic.

connection.py is the only module that imports ngh2; the others are what an
HTTP/2 stream means at each edge (the server's gRPC entry, the client's calls
to gRPC backends).
"""
