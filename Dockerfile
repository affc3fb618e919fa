# Runtime image for Ray pods (KubeRay), `ray up` VMs and job submitters: the official Ray image of the Ray version
# the project pins, with the project installed. Build and push (docs/cloud.md):
#   docker build -t <image_repository_url>:0.1.0 .                                  # GPU nodes (CUDA)
#   docker build --build-arg RAY_IMAGE_VARIANT=cpu -t <image_repository_url>:0.1.0-cpu .
ARG RAY_IMAGE_VARIANT=gpu
FROM rayproject/ray:2.60.0-py311-${RAY_IMAGE_VARIANT}

# The default PyPI wheel of torch for Linux x86_64 carries its own CUDA 12 runtime; the driver comes from the node
# (the EKS NVIDIA AMI or the Deep Learning AMI of ray up).
ARG TORCH="torch==2.13.0"

# The Ray image runs as `ray` (its Python lives in /home/ray); /app must be writable by it for the editable install.
USER root
RUN mkdir -p /app && chown ray:users /app
USER ray
WORKDIR /app
# pyproject.toml and conf/ beside the package: an editable install finds conf/ at /app/conf (conf_dir() looks
# next to the package), and LLM_PLATFORM_CONF says so explicitly for anything that runs from another directory.
COPY --chown=ray:users pyproject.toml setup.py README.md /app/
COPY --chown=ray:users llm_platform /app/llm_platform
COPY --chown=ray:users conf /app/conf

RUN pip install --no-cache-dir "${TORCH}" \
    && pip install --no-cache-dir -e "/app[harness,tracking]" \
    && python -c "import ray, llm_platform; assert ray.__version__ == '2.60.0', ray.__version__" \
    && llm-platform --help > /dev/null

# No LLM_PLATFORM_CONF: the editable install finds /app/conf by itself, and a job submitted with a working_dir
# must find the conf/ it uploaded, which an image-wide LLM_PLATFORM_CONF would override.
ENV TOKENIZERS_PARALLELISM=false
# Serve's HTTP proxy (on every node) answers its own errors (full queue, dead replica) in OpenAI's JSON shape.
ENV RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=llm_platform.serve.proxy:middlewares

# Storage settings (LLM_PLATFORM_BUCKET, AWS_REGION) come from the pod or VM; credentials from IRSA or the
# instance role. None is baked into the image.
