"""Loss terms: pure functions ``loss(params, inputs, batch, rng) -> (scalar, metrics)``.

One module per family: ``flow_matching`` (teacher training), ``trajectory`` (TraFlow, CD, CTM,
reflow, shortcut, mean-flow), ``tcd`` (TCD, LCM), ``distribution_matching`` (TDM, DMD). A method
is a config that names terms and weights (see ``registry``).
"""
