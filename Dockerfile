# syntax=docker/dockerfile:1
# memplugd in a container. The daemon needs the host's memory interfaces: run it
# privileged enough for hugetlb (see README, "Containers"), with the socket
# directory as a volume shared with its clients.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proto ./proto
COPY daemon ./daemon
COPY client ./client
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
VOLUME ["/run/memplug"]
ENTRYPOINT ["memplugd"]
