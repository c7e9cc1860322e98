"""Logical sharding axes and the mesh they map to."""
