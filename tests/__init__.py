"""Tests for tunneld."""
