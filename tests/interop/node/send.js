// Send through node-apn (@parse/node-apn), an unmodified third-party APNs provider client,
// with token (ES256 JWT) auth. node-apn is written for api.push.apple.com; its own options
// point it elsewhere: `address` and `port` (passed on to http2.connect and tls.connect) and
// `ca` (a PEM path it reads, the gateway's CA). Prints one "result {json}" line per send.
//
//     node send.js PORT CA_PEM AUTH_KEY KEY_ID TEAM TOPIC TOKEN

'use strict';

const apn = require('@parse/node-apn');

async function main([port, ca, key, keyId, teamId, topic, token]) {
  const provider = new apn.Provider({
    token: { key, keyId, teamId },
    address: 'localhost',
    port: Number(port),
    ca,
    production: false,
    connectionRetryLimit: 1,
    requestTimeout: 20000,
  });
  const sends = [
    // Delivered: the app prints the payload.
    { alert: 'from node-apn', id: '4f1e6a2c-9b3d-4c5e-8f70-1a2b3c4d5e6f', topic, to: token },
    // No such device: 400 BadDeviceToken.
    { alert: 'lost', id: '4f1e6a2c-9b3d-4c5e-8f70-000000000002', topic, to: '00'.repeat(32) },
    // A topic the key's team does not own: 400 TopicDisallowed.
    { alert: 'not yours', id: '4f1e6a2c-9b3d-4c5e-8f70-000000000003', topic: 'com.example.other', to: token },
  ];
  try {
    for (const s of sends) {
      const note = new apn.Notification();
      note.alert = s.alert;
      note.topic = s.topic;
      note.id = s.id;
      const { sent, failed } = await provider.send(note, s.to);
      for (const r of sent) {
        console.log('result ' + JSON.stringify({ ok: true, status: 200, id: r['apns-id'], device: r.device }));
      }
      for (const r of failed) {
        console.log('result ' + JSON.stringify({
          ok: false, status: r.status, reason: r.response && r.response.reason,
          id: r['apns-id'], device: r.device, error: r.error ? String(r.error) : undefined,
        }));
      }
    }
  } finally {
    await provider.shutdown();
  }
}

main(process.argv.slice(2)).catch(e => {
  console.error(e);
  process.exit(1);
});
