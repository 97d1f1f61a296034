"""The benchmark harness: goodput and SLO attainment, Punctual side by side with its peers.

    workloads.py   seeded synthetic request lists (chat, summarize, code, shared-prefix, ...)
    arrivals.py    open-loop send times: Poisson, gamma with burstiness
    sse.py         server-sent events from raw bytes
    loadgen.py     the async streaming client: per-token timing of every request
    metrics.py     percentiles, TTFT/TPOT/ITL/e2e, SLO attainment, fluidity index
    sweep.py       runs over workloads x rates, and the goodput search
    report.py      terminal tables and the JSON file;  plots.py  PNG plots
    peers.py       starting Punctual, llama-server and the static-batching floor
    llama_cpp.py   building llama-server and converting checkpoints to GGUF
    hf_server.py   the static-batching transformers server
    cli.py         `punctual bench` (run, compare, build-llama-cpp) and `punctual demo`
"""
