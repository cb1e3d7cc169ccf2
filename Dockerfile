FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY providers providers
COPY storage storage
COPY sql sql
RUN pip install --no-cache-dir .
ENV GATEWAY_DATA_DIR=/data
EXPOSE 8000
CMD ["gateway", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
