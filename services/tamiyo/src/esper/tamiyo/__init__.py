"""Tamiyo: Esper's policy worker. Builds a heterogeneous graph from each SystemStatePacket, runs the
GNN policy, applies the risk engine and answers with a signed AdaptationCommand or an explicit
DecisionFailure before the step deadline."""
