# The app on the embedded shapes model, listening on 0.0.0.0:7860, installed from a wheel (not editable).
#   CPU image (no CUDA wheels, about 1.5 GB smaller):
#     docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t salun-erasure:cpu .
#   GPU image (torch's default Linux wheels carry CUDA):
#     docker build -t salun-erasure .  &&  docker run --gpus all -p 7860:7860 salun-erasure
# Stable Diffusion instead of the embedded model: mount the weights and pass --model, e.g.
#   docker run -p 7860:7860 -v /path/to/sd:/models/sd salun-erasure erasure-app --host 0.0.0.0 --model /models/sd
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY erasure ./erasure
COPY eval ./eval
COPY app ./app
COPY prompts ./prompts
COPY models ./models
RUN pip wheel --no-deps --no-cache-dir -w /wheels .

FROM ${BASE}
ARG TORCH_INDEX=""
ENV PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False HF_HUB_DISABLE_TELEMETRY=1 PIP_NO_CACHE_DIR=1
COPY --from=build /wheels /wheels
RUN if [ -n "$TORCH_INDEX" ]; then pip install --index-url "$TORCH_INDEX" torch==2.14.1 torchvision==0.29.1; fi \
 && pip install /wheels/*.whl && rm -rf /wheels
WORKDIR /data
EXPOSE 7860
CMD ["erasure-app", "--host", "0.0.0.0", "--port", "7860", "--runs-dir", "/data/runs"]
