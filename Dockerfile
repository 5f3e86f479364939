# The GPU image for the Ray head and workers (KubeRay: cluster/rayjob.yaml; VMs: cluster/ray-cluster.yaml)
# and for one-off runs on one GPU machine:
#   docker build -t REGISTRY/omnilmm-ray:0.1.0 .
#   docker run --gpus all --shm-size=16g REGISTRY/omnilmm-ray:0.1.0 omnilmm-caption --input ... --output ...
# Base: Ray's own GPU image (CUDA runtime, Python 3.11, ray[default]) at the Ray version pyproject.toml pins;
# lmdeploy comes pinned through the `gpu` extra. tests/test_cluster.py checks both against pyproject.toml.
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/omnilmm-ray
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users omnilmm_ray ./omnilmm_ray
COPY --chown=ray:users cluster/install.sh ./cluster/install.sh
# The same install step as `make venv` and CI (cluster/install.sh), here with the GPU extra and no editable
# install: the image holds the built package.
RUN sh cluster/install.sh python gpu --no-cache-dir

# Downloaded models (engine.model: s3://...) are cached here, one copy per container.
ENV OMNILMM_CACHE=/tmp/omnilmm-ray
# No ENTRYPOINT: KubeRay and the cluster launcher start this image with their own command (the launcher
# runs `docker run IMAGE bash`), which an ENTRYPOINT would swallow. The default command shows the usage.
CMD ["omnilmm-caption", "--help"]
