"""Flower ServerApp of lordba-fl (thin: all logic lives in lordba_fl)."""
