"""`dflash-bench`: prompt sets, backends (in process, this project's server, vLLM, SGLang), the benchmark loop and
its reports."""
