# Triton image built on the CPU image: tritonserver from the nvidia-pytriton wheel (Triton 2.51, the release of
# NGC 24.10), which runs on CPU. For machines and clusters without NGC (dev, `make images`); tagged like
# triton.Dockerfile's image so the dev overlay runs it unchanged. Build from the repository root, after the CPU
# image: docker build -f deploy/docker/triton-cpu.Dockerfile --build-arg CPU_IMAGE=pony-platform/cpu:TAG .
ARG CPU_IMAGE=pony-platform/cpu:0.1.0
FROM ${CPU_IMAGE}
USER 0:0
# The layout of NGC's image: tritonserver on PATH and the Python backend (its 3.11 stub) under
# /opt/tritonserver/backends, so the Deployment's `tritonserver --model-repository=...` needs no backend flag.
# The stub embeds libpython3.11 and loads the wheel's bundled libraries: both folders go to the loader's
# cache (ldconfig) instead of an LD_LIBRARY_PATH that every child would inherit; fail if a library is missing.
RUN python -c "from pathlib import Path; from services.sampler.triton_server import prepare_backends; prepare_backends(Path('/opt/tritonserver/backends'))" \
 && python -c "import sysconfig; from services.sampler.triton_server import wheel_libs; print(sysconfig.get_config_var('LIBDIR')); print(wheel_libs())" \
      > /etc/ld.so.conf.d/pony-triton.conf \
 && ldconfig \
 && ln -s "$(python -c 'from services.sampler.triton_server import wheel_dir; print(wheel_dir())')/bin/tritonserver" /usr/local/bin/tritonserver \
 && for f in /usr/local/bin/tritonserver /opt/tritonserver/backends/python/*.so /opt/tritonserver/backends/python/triton_python_backend_stub; do \
      if ldd "$f" | grep "not found"; then echo "missing libraries for $f" >&2; exit 1; fi; done
# The stub's interpreter finds the venv through `python3` on PATH (/opt/venv/bin first, from the CPU image);
# PYTHONPATH names the project for the models' model.py. Idle OpenMP workers sleep instead of spinning.
ENV PYTHONPATH=/app \
    OMP_WAIT_POLICY=PASSIVE
USER 10001:10001
ENTRYPOINT []
CMD ["tritonserver", "--model-repository=/triton-repo", "--model-control-mode=explicit"]
