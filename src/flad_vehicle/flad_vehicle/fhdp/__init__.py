"""FHDP on the vehicle: pipeline stage workers that train encoder partitions over ZeroMQ."""
