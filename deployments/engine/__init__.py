"""One model's replica: the backends that load and run it, the scheduler and planner that decide every
forward pass, the engine that tokenises and admits calls, and the Serve deployment around them
(``model_server``).
"""
