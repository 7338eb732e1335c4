// TLS login cases for node-postgres, run by tests/tests/tls_drivers.rs.
//
//     node tls_node.js DBNAME CASE...
//
// Each CASE is `name,port,sslmode,rootcert,password,bind` (rootcert `-` for none, bind `1` to
// ask for channel binding: `enableChannelBinding`, SCRAM-SHA-256-PLUS when the server offers
// it). One line is printed per case, tab-separated:
//
//     name  ok     db=<current_database()> tls=<protocol> cn=<peer CN> mech=<SASL mechanism>
//     name  error  <the driver's error, on one line>
//
// The test decides which outcome each case must have; this program only reports.
'use strict'

const fs = require('fs')
const { Client } = require('pg')

function tlsOptions(sslmode, rootcert) {
  switch (sslmode) {
    case 'disable':
      return false
    case 'require':
      // libpq's `require`: encrypted, certificate not checked.
      return { rejectUnauthorized: false }
    case 'verify-full':
      // Chain checked against the CA file and the name against the host connected to.
      return { ca: fs.readFileSync(rootcert), rejectUnauthorized: true }
    default:
      throw new Error(`unknown sslmode ${sslmode}`)
  }
}

async function runCase(db, [name, port, sslmode, rootcert, password, bind]) {
  const client = new Client({
    host: '127.0.0.1',
    port: Number(port),
    user: 'postgres',
    password,
    database: db,
    ssl: tlsOptions(sslmode, rootcert),
    enableChannelBinding: bind === '1',
    connectionTimeoutMillis: 10000,
  })
  // node-postgres does not say which SASL mechanism it chose: record it on the way out.
  let mechanism = 'none'
  const connection = client.connection
  const sendInitial = connection.sendSASLInitialResponseMessage.bind(connection)
  connection.sendSASLInitialResponseMessage = (chosen, response) => {
    mechanism = chosen
    sendInitial(chosen, response)
  }
  client.on('error', () => {})
  try {
    await client.connect()
    const result = await client.query('SELECT current_database() AS db')
    const stream = client.connection.stream
    const tls = stream.encrypted ? stream.getProtocol() : 'off'
    const cn = stream.encrypted && stream.authorized ? stream.getPeerCertificate().subject.CN : '-'
    return `db=${result.rows[0].db} tls=${tls} cn=${cn} mech=${mechanism}`
  } finally {
    await client.end().catch(() => {})
  }
}

async function main() {
  const [db, ...cases] = process.argv.slice(2)
  for (const arg of cases) {
    const fields = arg.split(',')
    try {
      console.log(`${fields[0]}\tok\t${await runCase(db, fields)}`)
    } catch (err) {
      console.log(`${fields[0]}\terror\t${String(err.message || err).split(/\s+/).join(' ')}`)
    }
  }
}

main().catch((err) => {
  console.error(err)
  process.exit(2)
})
