"""serve.sh: the launcher (serve), the tritonserver process (server), its supervisor (restarts,
drain, hang detection), what a dead run leaves behind (leftovers) and the malloc and shared memory
the processes run with (memory). Imports model (metric names), engine (checkpoint checks),
protocol and settings; starts the OpenAI front as a process, by name."""
