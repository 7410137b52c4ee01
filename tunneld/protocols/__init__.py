"""Twisted adapters: HTTP entry, HTTP backend, WebSocket."""
