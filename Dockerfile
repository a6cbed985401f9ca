# syntax=docker/dockerfile:1
# Build stage: turn the project and its dependencies into wheels.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
COPY app ./app
COPY simulator ./simulator
# The pinned dependency set CI audits, plus the project itself.
RUN pip wheel --no-cache-dir --wheel-dir /wheels --no-deps -r requirements.lock .

# Runtime stage: only the installed wheels and the gunicorn settings, as a non-root user.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PORT=8000
RUN groupadd --system --gid 10001 proxy \
 && useradd --system --uid 10001 --gid proxy --no-create-home --shell /usr/sbin/nologin proxy
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
WORKDIR /srv
COPY gunicorn.conf.py ./
USER 10001:10001
# Behind the front (docker-compose.yml, deploy/k8s/) gunicorn listens on 8001 instead: PORT=8001.
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=2)"]
CMD ["gunicorn", "-c", "gunicorn.conf.py"]
