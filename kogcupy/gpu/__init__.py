"""The GPU runtime: kernel loading (the only CuPy RawModule user), the parameter block, device
weights, the build plan and placement, batched prefill, the monokernel backend (launch, token
stream, KV reuse), tensor parallel over several GPUs with KCCL, and GPU measurements."""
