"""The FLAD experiment end to end: a moving fleet, edges with coverage, SWIFT every round, FHDP, FedAvg, report."""
