def read_hest_bench(*args, **kwargs):
    raise NotImplementedError("read_hest_bench is being written")
