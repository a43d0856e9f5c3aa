"""The benchmarks' shared pieces, each in one place (the benchmarks import nothing else of each other):

- ``context``: the options every benchmark has, its folders, the nnU-Net side and notes;
- ``cache``: built inputs cached under parameters that name them;
- ``cases``: case builders (phantoms, real cases, raw datasets, test sets, workspaces, tiny models);
- ``measure``: a setting measured in a fresh child process (peak memory = the child's VmHWM);
- ``loader``: the loader-throughput rule (fixed warm-up, then timed batches);
- ``report``: the JSON report (versions, CPU model and flags, threads, results) and the Markdown table;
- ``nnunet`` / ``nnunet_side``: nnU-Net v2 in its own environment.

Importing this package imports nothing: ``loader`` and ``nnunet_side`` also run under nnU-Net's Python.
"""
