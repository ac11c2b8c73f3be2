# CPU image: the app on the embedded shapes model, listening on 0.0.0.0:7860.
#   docker build -t salun-erasure . && docker run -p 7860:7860 salun-erasure
# GPU: build FROM a CUDA runtime image with Python 3.11 instead, e.g.
#   docker build --build-arg BASE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 ...
# (install python3.11 + pip there) and run with `docker run --gpus all ...`; torch's default
# Linux wheel already carries CUDA. Mount SD weights with -v /path/to/sd:/models/sd and pass
# `--model /models/sd` to use Stable Diffusion instead of the embedded model.
ARG BASE=python:3.11-slim
FROM ${BASE}
ENV PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False HF_HUB_DISABLE_TELEMETRY=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/salun-erasure
COPY pyproject.toml README.md ./
COPY erasure ./erasure
COPY eval ./eval
COPY app ./app
COPY prompts ./prompts
COPY models ./models
RUN pip install torch==2.14.1 torchvision==0.29.1 && pip install -e .
EXPOSE 7860
CMD ["erasure-app", "--host", "0.0.0.0", "--port", "7860"]
