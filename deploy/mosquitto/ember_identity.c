/*
 * ember_identity: a Mosquitto 2.0 plugin (plugin API version 5) that ties an MQTT client id
 * to the identity of the client's TLS certificate.
 *
 * Why: Mosquitto disconnects a connected client when another client connects with the same
 * client id, and hands the newcomer its persistent session. Without this plugin any device
 * certificate could connect with another device's client id and take over its connection
 * and session (a denial of service). Mosquitto 2.0.11 has no built-in rule for this:
 * `use_identity_as_username true` skips every authentication plugin (src/handle_connect.c
 * calls mosquitto_unpwd_check only without it), so neither the dynamic-security plugin's
 * `clientid` field nor a MOSQ_EVT_BASIC_AUTH callback ever sees such a client; and
 * `use_username_as_clientid true` would give all of the fleet's connections (ingest, the
 * desired-state publisher, every replica) the same client id, so they would evict each other.
 *
 * What it does, in MOSQ_EVT_BASIC_AUTH, for every client of the listener it is loaded on:
 *
 *   * the identity is the common name (CN) of the client certificate, which the listener
 *     requires (`require_certificate true`); a certificate with no CN, several CNs or an
 *     embedded NUL is refused;
 *   * the identity `fleet_identity` (plugin option, required) MAY use any client id that
 *     starts with `fleet_client_id_prefix` (plugin option; when absent, any client id);
 *   * any other identity MUST be a device id (1-64 of A-Z a-z 0-9 - _ ., the rule of
 *     ember_proto::check_name) and MUST connect with its device id as client id; a device id
 *     that starts with `fleet_client_id_prefix` is refused (those client ids are the fleet's);
 *   * the identity becomes the client's MQTT user name (what `use_identity_as_username` did),
 *     so the ACL file's `%u` patterns and `user` lines apply to it; a user name or password
 *     the client sent is ignored.
 *
 * A refused client gets CONNACK "not authorised" and the connected client with that id is
 * not touched (Mosquitto evicts a client only after authentication succeeded).
 *
 * The listener MUST NOT set `use_identity_as_username` or `use_subject_as_username` (with
 * either, Mosquitto never calls this plugin) and MUST set `require_certificate true`.
 *
 * Build (Debian: gcc, mosquitto-dev, libmosquitto-dev, libssl-dev):
 *   gcc -std=c99 -O2 -Wall -Wextra -Werror -fPIC -shared ember_identity.c -o ember_identity.so -lcrypto
 * Configure, after the listener's TLS lines:
 *   plugin /path/to/ember_identity.so
 *   plugin_opt_fleet_identity ember:fleet
 *   plugin_opt_fleet_client_id_prefix ember-fleet
 */
#define _POSIX_C_SOURCE 200809L /* strdup */

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/asn1.h>
#include <openssl/objects.h>
#include <openssl/x509.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define DEVICE_ID_MAX 64

struct ember_identity {
	mosquitto_plugin_id_t *pid;
	char *fleet_identity;
	char *fleet_client_id_prefix; /* NULL: the fleet may use any client id */
};

static bool is_device_id(const char *s)
{
	size_t n = strlen(s);
	if(n == 0 || n > DEVICE_ID_MAX) return false;
	for(size_t i = 0; i < n; i++){
		char c = s[i];
		bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')
			|| c == '-' || c == '_' || c == '.';
		if(!ok) return false;
	}
	return true;
}

static bool starts_with(const char *s, const char *prefix)
{
	return strncmp(s, prefix, strlen(prefix)) == 0;
}

/* The certificate's only common name as a fresh string, or NULL (none, several, not text). */
static char *common_name(X509 *cert)
{
	X509_NAME *name = X509_get_subject_name(cert);
	if(!name) return NULL;
	int i = X509_NAME_get_index_by_NID(name, NID_commonName, -1);
	if(i < 0) return NULL;
	if(X509_NAME_get_index_by_NID(name, NID_commonName, i) >= 0) return NULL;
	X509_NAME_ENTRY *entry = X509_NAME_get_entry(name, i);
	if(!entry) return NULL;
	ASN1_STRING *data = X509_NAME_ENTRY_get_data(entry);
	if(!data) return NULL;
	int len = ASN1_STRING_length(data);
	const unsigned char *bytes = ASN1_STRING_get0_data(data);
	if(len <= 0 || !bytes || memchr(bytes, 0, (size_t)len)) return NULL;
	char *out = malloc((size_t)len + 1);
	if(!out) return NULL;
	memcpy(out, bytes, (size_t)len);
	out[len] = '\0';
	return out;
}

static int refuse(const char *cn, const char *client_id, const char *why)
{
	mosquitto_log_printf(MOSQ_LOG_WARNING,
			"ember_identity: refused certificate \"%.64s\" connecting with client id \"%.128s\": %s",
			cn ? cn : "", client_id ? client_id : "", why);
	return MOSQ_ERR_AUTH;
}

static int on_basic_auth(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_basic_auth *ed = event_data;
	struct ember_identity *self = userdata;
	(void)event;

	const char *client_id = mosquitto_client_id(ed->client);
	X509 *cert = mosquitto_client_certificate(ed->client);
	if(!cert){
		return refuse(NULL, client_id, "no client certificate (the listener needs require_certificate true)");
	}
	char *cn = common_name(cert);
	X509_free(cert);
	if(!cn){
		return refuse(NULL, client_id, "the certificate has no single, text common name");
	}

	int rc;
	if(!client_id){
		rc = refuse(cn, client_id, "no client id");
	}else if(strcmp(cn, self->fleet_identity) == 0){
		if(self->fleet_client_id_prefix && !starts_with(client_id, self->fleet_client_id_prefix)){
			rc = refuse(cn, client_id, "the fleet's client ids must start with plugin_opt_fleet_client_id_prefix "
					"(set [mqtt] client_id in the fleet's configuration)");
		}else{
			rc = MOSQ_ERR_SUCCESS;
		}
	}else if(!is_device_id(cn)){
		rc = refuse(cn, client_id, "the common name is neither the fleet identity nor a device id");
	}else if(self->fleet_client_id_prefix && starts_with(cn, self->fleet_client_id_prefix)){
		rc = refuse(cn, client_id, "device ids starting with plugin_opt_fleet_client_id_prefix are reserved for the fleet's client ids");
	}else if(strcmp(cn, client_id) != 0){
		rc = refuse(cn, client_id, "a device must connect with its device id (its certificate's common name) as MQTT client id");
	}else{
		rc = MOSQ_ERR_SUCCESS;
	}

	if(rc == MOSQ_ERR_SUCCESS){
		/* What use_identity_as_username did: the ACL's %u and user lines now see the CN. */
		rc = mosquitto_set_username(ed->client, cn);
		if(rc != MOSQ_ERR_SUCCESS){
			mosquitto_log_printf(MOSQ_LOG_ERR, "ember_identity: cannot set the user name of \"%.64s\"", cn);
			rc = MOSQ_ERR_AUTH;
		}
	}
	free(cn);
	return rc;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for(int i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

static void free_self(struct ember_identity *self)
{
	if(!self) return;
	free(self->fleet_identity);
	free(self->fleet_client_id_prefix);
	free(self);
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
		struct mosquitto_opt *options, int option_count)
{
	struct ember_identity *self = calloc(1, sizeof(*self));
	if(!self) return MOSQ_ERR_NOMEM;
	self->pid = identifier;
	for(int i = 0; i < option_count; i++){
		const char *key = options[i].key, *value = options[i].value;
		char **slot = NULL;
		if(!strcmp(key, "fleet_identity")){
			slot = &self->fleet_identity;
		}else if(!strcmp(key, "fleet_client_id_prefix")){
			slot = &self->fleet_client_id_prefix;
		}else{
			mosquitto_log_printf(MOSQ_LOG_ERR,
					"ember_identity: unknown option plugin_opt_%s (known: fleet_identity, fleet_client_id_prefix)", key);
			free_self(self);
			return MOSQ_ERR_INVAL;
		}
		if(!value || !value[0]){
			mosquitto_log_printf(MOSQ_LOG_ERR, "ember_identity: plugin_opt_%s is empty", key);
			free_self(self);
			return MOSQ_ERR_INVAL;
		}
		free(*slot);
		*slot = strdup(value);
		if(!*slot){
			free_self(self);
			return MOSQ_ERR_NOMEM;
		}
	}
	if(!self->fleet_identity){
		mosquitto_log_printf(MOSQ_LOG_ERR,
				"ember_identity: plugin_opt_fleet_identity is missing (the fleet certificate's common name, e.g. ember:fleet)");
		free_self(self);
		return MOSQ_ERR_INVAL;
	}
	if(is_device_id(self->fleet_identity)){
		mosquitto_log_printf(MOSQ_LOG_ERR,
				"ember_identity: plugin_opt_fleet_identity \"%s\" could be a device id: it must contain ':'",
				self->fleet_identity);
		free_self(self);
		return MOSQ_ERR_INVAL;
	}
	int rc = mosquitto_callback_register(identifier, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, self);
	if(rc != MOSQ_ERR_SUCCESS){
		free_self(self);
		return rc;
	}
	mosquitto_log_printf(MOSQ_LOG_NOTICE,
			"ember_identity: client id = certificate common name for devices; fleet identity \"%s\" with client ids %s%s%s",
			self->fleet_identity,
			self->fleet_client_id_prefix ? "starting with \"" : "of any form",
			self->fleet_client_id_prefix ? self->fleet_client_id_prefix : "",
			self->fleet_client_id_prefix ? "\"" : "");
	*userdata = self;
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	struct ember_identity *self = userdata;
	(void)options;
	(void)option_count;
	if(self){
		mosquitto_callback_unregister(self->pid, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
		free_self(self);
	}
	return MOSQ_ERR_SUCCESS;
}
