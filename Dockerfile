# monomail in a container: one process, config under /etc/monomail, spool and mail in volumes.
#   docker build -t monomail .
#   docker run -p 25:25 -v monomail-spool:/var/spool/monomail -v monomail-mail:/var/mail \
#              -v ./monomail.toml:/etc/monomail/monomail.toml:ro monomail
FROM python:3.12-slim

RUN useradd --system --home-dir /var/spool/monomail --shell /usr/sbin/nologin monomail \
 && mkdir -p /etc/monomail /var/spool/monomail /var/mail \
 && chown monomail:monomail /var/spool/monomail /var/mail

WORKDIR /src
COPY pyproject.toml README.md ./
COPY monomail ./monomail
RUN pip install --no-cache-dir '.[fast]' && rm -rf /src \
 && ln -sf "$(command -v sendmail)" /usr/sbin/sendmail \
 && ln -sf "$(command -v sendmail)" /usr/bin/mailq

# The container's config: all interfaces, data in the volumes (deploy/container.toml).
COPY deploy/container.toml /etc/monomail/monomail.toml

# Started as root: monomail binds 25/587/465, then runs as `monomail` (server.user).
WORKDIR /var/spool/monomail
VOLUME ["/var/spool/monomail", "/var/mail"]
EXPOSE 25 587 465
STOPSIGNAL SIGTERM
# Healthy only while the server answers its SMTP banner and its queue runner lives.
HEALTHCHECK --interval=30s --timeout=5s CMD ["monomail", "status", "-c", "/etc/monomail/monomail.toml"]
CMD ["monomail", "serve", "-c", "/etc/monomail/monomail.toml"]
