"""The federation: the Flower strategy, the client- and server-side handlers, checkpoints, simulated
faults, run reports and deployment helpers. The top of the library: nothing in it is imported below."""
