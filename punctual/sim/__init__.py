"""The simulator: the shipped scheduler, KV manager and router in virtual time (no torch).

    profile.py    step-cost profiles: a plan's features -> seconds (fitted, or a roofline estimate)
    replica.py    one replica: Scheduler + KVCacheManager, the runner replaced by the profile
    routing.py    which replica gets a request: punctual.cluster.router, fed the cluster client's counts
    engine.py     the event loop: arrivals and step completions in virtual time
    loadgen.py    the simulator as the bench's load generator (same requests, same JSON)
    hardware.py   roofline estimates for machines not at hand
    calibrate.py  profiling the real runner here (imports torch; not on the run path)
    planner.py    capacity planning: the cheapest configuration within the SLOs
    validate.py   the simulator against a real server on the same workloads
    cli.py        `punctual sim run | calibrate | plan | validate`
"""
