// TLS login cases for pgjdbc, run by tests/tests/tls_drivers.rs (compiled there with javac).
//
//     java -cp DIR:postgresql.jar TlsClient DBNAME CASE...
//
// Each CASE is `name,port,sslmode,rootcert,password,bind` (rootcert `-` for none, bind `1` to
// require channel binding where this pgjdbc has `channelBinding`, 42.7.4 and later). One line
// is printed per case, tab-separated:
//
//     name  ok     db=<current_database()> binding=<require|unsupported> [tls=<protocol> cn=<peer CN>]
//     name  error  <the driver's error, on one line>
//
// The test decides which outcome each case must have; this program only reports.

import java.security.cert.X509Certificate;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.Properties;
import javax.net.ssl.HostnameVerifier;
import javax.net.ssl.SSLPeerUnverifiedException;
import javax.net.ssl.SSLSession;

public class TlsClient {
    /** What the last verified handshake showed: its protocol and the certificate's subject. */
    static volatile String seen = null;

    /**
     * pgjdbc's own host name check (`sslmode=verify-full`), which also notes the TLS session it
     * was asked about: pgjdbc has no other way to show it.
     */
    public static class Recorder implements HostnameVerifier {
        @Override
        public boolean verify(String hostname, SSLSession session) {
            String cn = "-";
            try {
                X509Certificate peer = (X509Certificate) session.getPeerCertificates()[0];
                for (String part : peer.getSubjectX500Principal().getName().split(",")) {
                    if (part.startsWith("CN=")) {
                        cn = part.substring(3);
                    }
                }
            } catch (SSLPeerUnverifiedException e) {
                cn = "unverified";
            }
            seen = "tls=" + session.getProtocol() + " cn=" + cn;
            return org.postgresql.ssl.PGjdbcHostnameVerifier.INSTANCE.verify(hostname, session);
        }
    }

    static boolean hasChannelBinding() {
        try {
            org.postgresql.PGProperty.valueOf("CHANNEL_BINDING");
            return true;
        } catch (IllegalArgumentException e) {
            return false;
        }
    }

    static String runCase(String db, String[] c) throws SQLException {
        Properties props = new Properties();
        props.setProperty("user", "postgres");
        props.setProperty("password", c[4]);
        props.setProperty("sslmode", c[2]);
        props.setProperty("connectTimeout", "10");
        if (!c[3].equals("-")) {
            props.setProperty("sslrootcert", c[3]);
        }
        if (c[2].equals("verify-full")) {
            props.setProperty("sslhostnameverifier", Recorder.class.getName());
        }
        String binding = "unsupported";
        if (c[5].equals("1") && hasChannelBinding()) {
            props.setProperty("channelBinding", "require");
            binding = "require";
        }
        seen = null;
        String url = "jdbc:postgresql://127.0.0.1:" + c[1] + "/" + db;
        try (Connection conn = DriverManager.getConnection(url, props);
                Statement st = conn.createStatement();
                ResultSet rs = st.executeQuery("SELECT current_database()")) {
            rs.next();
            String shown = "db=" + rs.getString(1) + " binding=" + binding;
            return seen == null ? shown : shown + " " + seen;
        }
    }

    public static void main(String[] args) {
        String db = args[0];
        for (int i = 1; i < args.length; i++) {
            String[] c = args[i].split(",", -1);
            try {
                System.out.println(c[0] + "\tok\t" + runCase(db, c));
            } catch (SQLException e) {
                StringBuilder message = new StringBuilder(String.valueOf(e.getMessage()));
                for (Throwable cause = e.getCause(); cause != null; cause = cause.getCause()) {
                    message.append(" / ").append(cause);
                }
                System.out.println(c[0] + "\terror\t" + message.toString().replaceAll("\\s+", " "));
            }
        }
    }
}
