# The GPU image for the Ray head and workers (KubeRay: cluster/rayjob.yaml; VMs: cluster/ray-cluster.yaml)
# and for one-off runs on one GPU machine:
#   docker build -t REGISTRY/omnilmm-ray:0.1.0 .
#   docker run --gpus all --shm-size=16g REGISTRY/omnilmm-ray:0.1.0 omnilmm-caption --input ... --output ...
#   docker run REGISTRY/omnilmm-ray:0.1.0 omnilmm-caption report --output URI        # the runs' history
#   docker run REGISTRY/omnilmm-ray:0.1.0 omnilmm-caption latest --output URI --to FILE  # newest captions
# Base: Ray's own GPU image (CUDA runtime, Python 3.11, ray[default]) at the Ray version pyproject.toml pins;
# lmdeploy comes pinned through the `gpu` extra, and torch, transformers (and lmdeploy, ray) through
# cluster/constraints-gpu.txt, the versions the GPU tests passed with. tests/test_cluster*.py check all three
# against pyproject.toml and the GPU results.
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/omnilmm-ray
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users omnilmm_ray ./omnilmm_ray
COPY --chown=ray:users cluster/install.sh cluster/constraints-gpu.txt ./cluster/
# The same install step as `make venv` and CI (cluster/install.sh), here with the GPU extra and no editable
# install: the image holds the built package. install.sh builds from a copy in a temporary folder, so this
# works whoever owns WORKDIR (Kaniko creates it as root; pip runs as the image's user, ray).
RUN sh cluster/install.sh python gpu --no-cache-dir

# Downloaded models (engine.model: s3://...) are cached here, one copy per container.
ENV OMNILMM_CACHE=/tmp/omnilmm-ray
# No ENTRYPOINT: KubeRay and the cluster launcher start this image with their own command (the launcher
# runs `docker run IMAGE bash`), which an ENTRYPOINT would swallow. The default command shows the usage.
CMD ["omnilmm-caption", "--help"]
