# Accept one connection on 127.0.0.1:PORT, save its first TLS record, close.
import socket, sys
port, out = int(sys.argv[1]), sys.argv[2]
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port)); s.listen(1); s.settimeout(20)
c, _ = s.accept(); c.settimeout(5)
buf = b""
while len(buf) < 5 or len(buf) < 5 + int.from_bytes(buf[3:5], "big"):
    chunk = c.recv(65536)
    if not chunk: break
    buf += chunk
open(out, "wb").write(buf)
c.close()
