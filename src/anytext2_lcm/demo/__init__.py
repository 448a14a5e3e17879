"""The demo and the fidelity benchmark of the tiny model (see ``anytext2-lcm demo``)."""
