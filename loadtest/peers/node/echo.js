// The echo server from the `ws` README ("Simple server"), with the port
// and host taken from the environment so the benchmark can choose them.
import { WebSocketServer } from 'ws';

const wss = new WebSocketServer({ host: process.env.HOST || '127.0.0.1', port: Number(process.env.PORT || 8080) });

wss.on('connection', function connection(ws) {
  ws.on('error', console.error);
  ws.on('message', function message(data, isBinary) {
    ws.send(data, { binary: isBinary });
  });
});
