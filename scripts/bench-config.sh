# Sourced by scripts/bench.sh and scripts/bench-instructions.sh: writes the configurations both
# use into $WORK, so every measurement runs the edge, nginx and HAProxy configured the same way.
# Needs WORK, UP_PORT, EDGE_PORT, EDGE_ADMIN, NGINX_PORT, HAPROXY_PORT, NB, SID, OWNER, NOFILE and
# HAPROXY_MAXCONN; NGINX_MASTER=off runs nginx as one process (for valgrind).

write_bench_configs() {
  openssl genpkey -algorithm ed25519 -out "$WORK/url-signing.pem" 2>/dev/null
  openssl pkey -in "$WORK/url-signing.pem" -pubout -out "$WORK/url-signing.pub.pem" 2>/dev/null
  COOKIE_KEY=$(openssl rand -hex 32)
  mkdir -p "$WORK/edge-data"
  cat >"$WORK/routes.json" <<EOF
{"version":1,"routes":[{"notebookId":"$NB","sessionId":"$SID","upstream":"127.0.0.1:$UP_PORT","upstreamToken":"x","ownerId":"$OWNER","viewers":[]}]}
EOF
  cat >"$WORK/edge.toml" <<EOF
data_dir = "$WORK/edge-data"
log = "warn"

[tokens]
issuer = "marina-control"
audience = "marina-edge"
public_keys = [{ kid = "k1", file = "$WORK/url-signing.pub.pem" }]

[proxy]
listen = "127.0.0.1:$EDGE_PORT"
admin_listen = "127.0.0.1:$EDGE_ADMIN"
public_url = "http://127.0.0.1:$EDGE_PORT"
routes_file = "$WORK/routes.json"

[proxy.cookie]
keys = ["$COOKIE_KEY"]
EOF

  # nginx: one worker, keep-alive pool to the upstream, WebSocket upgrade headers, no logging,
  # buffers in memory (never temp files), the same upstream Authorization the edge adds.
  mkdir -p "$WORK/nginx"
  cat >"$WORK/nginx.conf" <<EOF
worker_processes 1;
worker_rlimit_nofile $NOFILE;
master_process ${NGINX_MASTER:-on};
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 16384; multi_accept on; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx/client_body;
  proxy_temp_path $WORK/nginx/proxy;
  fastcgi_temp_path $WORK/nginx/fastcgi;
  uwsgi_temp_path $WORK/nginx/uwsgi;
  scgi_temp_path $WORK/nginx/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  map \$http_upgrade \$connection_upgrade { default upgrade; '' ''; }
  upstream marimo {
    server 127.0.0.1:$UP_PORT;
    keepalive 512;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
  }
  server {
    listen 127.0.0.1:$NGINX_PORT backlog=4096;
    location / {
      proxy_pass http://marimo;
      proxy_http_version 1.1;
      proxy_set_header Host \$host;
      proxy_set_header Upgrade \$http_upgrade;
      proxy_set_header Connection \$connection_upgrade;
      proxy_set_header Authorization "Bearer x";
      proxy_buffers 16 16k;
      proxy_buffer_size 16k;
      proxy_max_temp_file_size 0;
      proxy_read_timeout 3600s;
      proxy_send_timeout 3600s;
    }
  }
}
EOF

  # HAProxy: one thread, HTTP mode, keep-alive both sides, WebSocket tunnels allowed to idle.
  cat >"$WORK/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn $HAPROXY_MAXCONN
  log stderr format raw local0 err
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 3600s
  timeout server 3600s
  timeout tunnel 3600s
  timeout http-keep-alive 300s
frontend fe
  bind 127.0.0.1:$HAPROXY_PORT
  maxconn $HAPROXY_MAXCONN
  default_backend marimo
backend marimo
  http-request set-header Authorization "Bearer x"
  server up1 127.0.0.1:$UP_PORT maxconn $HAPROXY_MAXCONN
EOF
}
