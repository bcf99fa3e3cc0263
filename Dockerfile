# teamster worker / watchdog / flower image (docker compose builds it; see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY teamster ./teamster
COPY config ./config
COPY agents ./agents
COPY tasks ./tasks
COPY orchestrator ./orchestrator
COPY examples ./examples
# Extras for the other providers: docker compose build --build-arg EXTRAS="[openai]"
ARG EXTRAS=""
RUN pip install ".${EXTRAS}" && useradd --create-home --uid 10001 teamster
USER teamster
EXPOSE 9808 5555
CMD ["teamster", "worker"]
