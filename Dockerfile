FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY sketches ./sketches
COPY streamagg ./streamagg
RUN pip install --no-cache-dir .
USER nobody
CMD ["streamagg", "--help"]
